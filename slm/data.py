"""Documents -> tokens -> packed fixed-length blocks, cached on disk by their settings.

Sources: the built-in corpus (``source: builtin``), local text / JSON Lines / Parquet files (a
file, a glob or a folder), or an HF hub dataset name. Documents are joined with an end-of-document
token and cut into blocks of ``block_size`` tokens; the last block of each packing batch is
padded (labels ``-100``) so no token is dropped. Packed splits are saved under
``cache_dir/packed/<hash of every setting>`` so a second run loads them instantly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slm.corpus import CorpusConfig, generate
from slm.tokenizer import BUILTIN, load_tokenizer, tokenizer_identity

log = logging.getLogger(__name__)

PACK_VERSION = 1
IGNORE_INDEX = -100
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
           ".parquet": "parquet"}  # fmt: skip


def default_cache_dir() -> str:
    return os.environ.get("SLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "slm"))


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | a file, glob or folder | an HF hub dataset name
    tokenizer: str = BUILTIN  # builtin | an HF tokenizer name or local path
    block_size: int = 128
    text_field: str = "text"
    sample_by: str = "paragraph"  # text files: one document per line | paragraph | document (file)
    hub_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"  # hub split; None or missing: carve val_fraction
    val_fraction: float = 0.05
    seed: int = 0
    cache_dir: str | None = None
    num_proc: int | None = None
    builtin: dict = field(default_factory=dict)  # CorpusConfig fields

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"data.block_size must be >= 2 (one input and one target), got {self.block_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        self.builtin = dict(self.builtin)
        self.cache_dir = self.cache_dir or default_cache_dir()


@dataclass
class PackedData:
    splits: dict  # name -> datasets.Dataset with input_ids, labels, attention_mask[, answer_mask]
    tokenizer: object
    identity: dict  # what a stored reference column must agree with

    def __getitem__(self, split: str):
        return self.splits[split]


def data_config(cfg) -> DataConfig:
    """A :class:`DataConfig` from a Hydra node, a dict or a DataConfig."""
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except ImportError:
        cfg = dict(cfg)
    return DataConfig(**cfg)


# --- raw documents ---------------------------------------------------------------------------


def _data_files(source: str) -> list[str]:
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in FORMATS)
    elif any(c in source for c in "*?["):
        files = sorted(glob.glob(os.path.expanduser(source), recursive=True))
    else:
        files = [str(p)] if p.exists() else []
    if not files:
        raise FileNotFoundError(f"data.source={source!r}: no data files found (looked for {sorted(FORMATS)} files)")
    kinds = {FORMATS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"data.source={source!r}: files must all be one of text/json/parquet, got {files[:5]}")
    return files


def _is_local(source: str) -> bool:
    """A path, glob or file name; anything else (``org/name``) is a hub dataset name."""
    return (
        os.path.exists(os.path.expanduser(source))
        or any(c in source for c in "*?[")
        or source.startswith((".", "/", "~"))
        or Path(source).suffix in FORMATS
    )


def _source_identity(cfg: DataConfig) -> dict:
    if cfg.source == BUILTIN:
        return {"builtin": CorpusConfig(**cfg.builtin).identity()}
    if _is_local(cfg.source):
        files = _data_files(cfg.source)
        stat = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
        return {"files": stat, "text_field": cfg.text_field, "sample_by": cfg.sample_by}
    return {"hub": cfg.source, "config": cfg.hub_config, "text_field": cfg.text_field,
            "splits": [cfg.train_split, cfg.validation_split]}  # fmt: skip


def raw_documents(cfg: DataConfig) -> dict:
    """Split name -> a ``datasets.Dataset`` of documents with a ``text`` column."""
    import datasets

    if cfg.source == BUILTIN:
        corpus = CorpusConfig(**cfg.builtin)
        return {s: datasets.Dataset.from_list(generate(corpus, s)) for s in ("train", "clean", "validation")}
    if _is_local(cfg.source):
        files = _data_files(cfg.source)
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"data.source={cfg.source!r}: no documents (every file is empty)")
        builder = FORMATS[Path(files[0]).suffix]
        kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
        try:
            ds = {"train": datasets.load_dataset(builder, data_files=files, split="train", **kwargs)}
        except datasets.exceptions.DatasetGenerationError as e:
            raise ValueError(
                f"data.source={cfg.source!r}: could not read the {builder} files: {e.__cause__ or e}"
            ) from e
    else:
        try:
            loaded = datasets.load_dataset(cfg.source, cfg.hub_config)
        except Exception as e:  # offline, unknown name, gated, ...
            raise ValueError(f"data.source={cfg.source!r}: could not load this hub dataset: {e}") from e
        if cfg.train_split not in loaded:
            raise ValueError(f"data.train_split={cfg.train_split!r} not in {list(loaded)}")
        ds = {"train": loaded[cfg.train_split]}
        if cfg.validation_split and cfg.validation_split in loaded:
            ds["validation"] = loaded[cfg.validation_split]
    for name, d in ds.items():
        if cfg.text_field not in d.column_names:
            raise ValueError(
                f"data.text_field={cfg.text_field!r} is not a column of {cfg.source!r} ({name}); "
                f"columns: {d.column_names}"
            )
        if len(d) == 0:
            raise ValueError(f"data.source={cfg.source!r}: the {name} split has no documents")
        ds[name] = (
            d.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text")
            if cfg.text_field != "text"
            else d.select_columns(["text"])
        )
    if "validation" not in ds:
        parts = ds["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
        ds = {"train": parts["train"], "validation": parts["test"]}
    return ds


# --- tokenise and pack -----------------------------------------------------------------------


def _tokenize(batch: dict, tokenizer) -> dict:
    spans = batch.get("answer_spans")
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=spans is not None)
    out = {"ids": enc["input_ids"]}
    if spans is not None:
        out["answer"] = [
            [any(s <= a and b <= e for s, e in doc_spans) for a, b in offsets]
            for offsets, doc_spans in zip(enc["offset_mapping"], spans)
        ]
    return out


def _pack(batch: dict, block_size: int, eos_id: int, pad_id: int) -> dict:
    """Concatenate documents with ``eos`` after each, cut into blocks, pad the last one."""
    ids = [t for doc in batch["ids"] for t in (*doc, eos_id)]
    answer = [a for doc in batch["answer"] for a in (*doc, False)] if "answer" in batch else None
    n = len(ids)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    if answer is not None:
        out["answer_mask"] = []
    for i in range(0, n, block_size):
        block = ids[i : i + block_size]
        pad = block_size - len(block)
        out["input_ids"].append(block + [pad_id] * pad)
        out["labels"].append(block + [IGNORE_INDEX] * pad)
        out["attention_mask"].append([1] * len(block) + [0] * pad)
        if answer is not None:
            out["answer_mask"].append(answer[i : i + block_size] + [False] * pad)
    return out


def pack(docs, tokenizer, block_size: int, num_proc: int | None = None, desc: str = ""):
    """Tokenise a dataset of documents and pack it into ``block_size`` blocks (one pass each)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tok = docs.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer}, remove_columns=docs.column_names,
                   num_proc=num_proc, desc=f"tokenising {desc}")  # fmt: skip
    return tok.map(_pack, batched=True, batch_size=2000, remove_columns=tok.column_names, num_proc=num_proc,
                   fn_kwargs={"block_size": block_size, "eos_id": eos, "pad_id": pad},
                   desc=f"packing {desc}")  # fmt: skip


def column_hash(ds, column: str, dtype=np.int64) -> str:
    """sha256 of one column of a packed dataset, read in blocks of rows."""
    h = hashlib.sha256()
    for i in range(0, len(ds), 4096):
        h.update(np.asarray(ds[i : i + 4096][column], dtype=dtype).tobytes())
    return h.hexdigest()[:16]


def content_hash(ds) -> str:
    """sha256 of the packed token ids: identifies the data a stored ref column belongs to."""
    return column_hash(ds, "input_ids")


def build(cfg) -> PackedData:
    """Load, tokenise, pack and shuffle (train) every split, or load them from the cache."""
    import datasets

    cfg = data_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    settings = {"pack_version": PACK_VERSION, "source": _source_identity(cfg),
                "tokenizer": tokenizer_identity(tokenizer), "block_size": cfg.block_size, "seed": cfg.seed,
                "val_fraction": cfg.val_fraction}  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    where = Path(cfg.cache_dir) / "packed" / key
    meta_file = where / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        splits = {s: datasets.load_from_disk(str(where / s)) for s in meta["splits"]}
        log.info("data: loaded packed splits %s from %s", list(splits), where)
        return PackedData(splits, tokenizer, meta["identity"])

    splits = {}
    for name, docs in raw_documents(cfg).items():
        packed = pack(docs, tokenizer, cfg.block_size, cfg.num_proc, desc=name)
        if len(packed) == 0:
            raise ValueError(f"data.source={cfg.source!r}: the {name} split produced no tokens")
        if name == "train":
            packed = packed.shuffle(seed=cfg.seed).flatten_indices()
        splits[name] = packed
    identity = {"tokenizer": settings["tokenizer"], "block_size": cfg.block_size,
                "data_hash": {s: content_hash(d) for s, d in splits.items()}}  # fmt: skip
    tmp = where.with_name(key + f".tmp{os.getpid()}")
    for name, d in splits.items():
        d.save_to_disk(str(tmp / name))
    (tmp / "meta.json").write_text(json.dumps({"splits": list(splits), "identity": identity,
                                               "settings": settings}, indent=1, default=str))  # fmt: skip
    try:
        os.replace(tmp, where)  # atomic: concurrent sweep jobs never see a half-written cache
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    splits = {s: datasets.load_from_disk(str(where / s)) for s in splits}
    log.info("data: packed %s into %s", {s: len(d) for s, d in splits.items()}, where)
    return PackedData(splits, tokenizer, identity)


def check_block_size(model_config, block_size: int) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise ValueError(
            f"data.block_size={block_size} is larger than the model allows (max_position_embeddings={limit}); "
            f"lower data.block_size"
        )
