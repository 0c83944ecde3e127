"""Documents -> tokens -> packed fixed-length blocks, cached on disk by their settings.

Documents (see :mod:`slm.data.sources`) are joined with an end-of-document token and cut into blocks
of ``block_size`` tokens; the last block of each packing batch is padded (labels ``-100``) so no
token is dropped. A long document is tokenised in pieces of at most :data:`PIECE_CHARS`
characters (cut after a line break or a space where there is one), so memory stays flat whatever
the document's length. Packed splits are saved under ``cache_dir/packed/<hash of every
setting>`` so a second run loads them instantly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from slm.data import subword
from slm.data.locks import CacheLock
from slm.data.sources import (
    BUILTIN,
    GENERATED,
    SOURCE_COLUMN,
    document_hashes,
    generated_documents,
    label_names,
    raw_documents,
    source_documents,
    warn_overlap,
)
from slm.data.spec import PackedData, SourceSpec, data_config, source_identity
from slm.data.tokenizer import load_tokenizer, tokenizer_identity

log = logging.getLogger(__name__)

PACK_VERSION = 5  # 4: the real-text corpus's clean_mask; 5: junk_kind, source_id
IGNORE_INDEX = -100
PIECE_CHARS = 1 << 16  # characters tokenised at once: bounds memory for arbitrarily long documents
PACK_ROWS = 256  # pieces per packing batch (each batch pads at most its last block)


# --- tokenise and pack -----------------------------------------------------------------------


def _cut_points(text: str, limit: int) -> list[int]:
    """Piece boundaries of ``text``: each piece at most ``limit`` characters, ending after a line
    break or a space when one lies in its second half (so a word is rarely cut in two)."""
    cuts, start = [], 0
    while len(text) - start > limit:
        window = text[start : start + limit]
        at = max(window.rfind("\n"), window.rfind(" "))
        end = start + (at + 1 if at >= limit // 2 else limit)
        cuts.append(end)
        start = end
    return cuts


# Character spans a corpus marks in its documents -> the per-token mask packing keeps: the built-in
# corpus's answers (answer accuracy), the real-text corpus's clean text (the oracle arm, the selection
# audit). A token is marked only when all of its characters lie inside one span.
SPAN_MASKS = {"answer_spans": "answer_mask", "clean_spans": "clean_mask"}
# Labelled spans ``[start, end, label]`` -> a per-token label (0 outside them): what kind of junk a token
# belongs to (the audit's per-kind shares). A token takes the label of the first span any of its
# characters lies in, so a token mixing clean text and junk counts as junk.
SPAN_LABELS = {"junk_spans": "junk_kind"}
# A document's own label (an integer column of the documents) -> every token of the document, its
# end-of-document token included: which file it came from (the audit's per-source shares).
DOC_LABELS = (SOURCE_COLUMN,)
LABEL_COLUMNS = (*SPAN_LABELS.values(), *DOC_LABELS)  # stored as int16


def junk_mask(batch: dict):
    """The tokens a corpus marks as junk: those a junk span covers (``junk_kind > 0``) where it names its junk,
    else every token it does not mark clean. Paragraph breaks and document ends of a corpus that names its junk
    are neither clean nor junk."""
    return batch["junk_kind"] > 0 if "junk_kind" in batch else batch["clean_mask"] == 0


def _split_long(batch: dict, limit: int) -> dict:
    """Documents -> pieces of at most ``limit`` characters; ``last`` marks a document's final piece."""
    out = {"text": [], "last": []}
    spans = [k for k in (*SPAN_MASKS, *SPAN_LABELS) if k in batch]
    labels = [k for k in DOC_LABELS if k in batch]
    for k in (*spans, *labels):
        out[k] = []
    for d, text in enumerate(batch["text"]):
        bounds = [0, *_cut_points(text, limit), len(text)]
        for a, b in zip(bounds, bounds[1:]):
            out["text"].append(text[a:b])
            out["last"].append(b == len(text))
            for k in spans:  # spans move with their piece: an answer cut in two is dropped, the others are cut
                cut = k != "answer_spans"
                kept = [
                    span
                    for span in batch[k][d]
                    if (span[0] < b and a < span[1] if cut else a <= span[0] and span[1] <= b)
                ]
                out[k].append([[max(span[0], a) - a, min(span[1], b) - a, *span[2:]] for span in kept])
            for k in labels:
                out[k].append(batch[k][d])
    return out


def _span_label(a: int, b: int, spans: list) -> int:
    return next((label for s, e, label in spans if s < b and a < e), 0)


def _tokenize(batch: dict, tokenizer) -> dict:
    marked = [k for k in (*SPAN_MASKS, *SPAN_LABELS) if k in batch]
    enc = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=bool(marked))
    out = {"ids": enc["input_ids"], "last": batch["last"]}
    for k in marked:
        if k in SPAN_MASKS:
            out[SPAN_MASKS[k]] = [
                [any(s <= a and b <= e for s, e in doc_spans) for a, b in offsets]
                for offsets, doc_spans in zip(enc["offset_mapping"], batch[k])
            ]
        else:
            out[SPAN_LABELS[k]] = [
                [_span_label(a, b, doc_spans) for a, b in offsets]
                for offsets, doc_spans in zip(enc["offset_mapping"], batch[k])
            ]
    for k in DOC_LABELS:  # one value per piece, spread over its tokens when packed
        if k in batch:
            out[k] = batch[k]
    return out


def _pack(batch: dict, block_size: int, eos_id: int, pad_id: int) -> dict:
    """Concatenate pieces (``eos`` after each document's last one), cut into blocks, pad the last one."""
    ids = [t for doc, last in zip(batch["ids"], batch["last"]) for t in (*doc, *([eos_id] if last else []))]
    masks = {k: _per_token(batch, k) for k in (*SPAN_MASKS.values(), *LABEL_COLUMNS) if k in batch}
    n = len(ids)
    out = {"input_ids": [], "labels": [], "attention_mask": [], **{k: [] for k in masks}}
    for i in range(0, n, block_size):
        block = ids[i : i + block_size]
        pad = block_size - len(block)
        out["input_ids"].append(block + [pad_id] * pad)
        out["labels"].append(block + [IGNORE_INDEX] * pad)
        out["attention_mask"].append([1] * len(block) + [0] * pad)
        for k, m in masks.items():
            out[k].append(m[i : i + block_size] + [False if k in SPAN_MASKS.values() else 0] * pad)
    return out


def _per_token(batch: dict, column: str) -> list:
    """A column's value for every token of the packing batch, each document's end token included: a
    document's label on all of its tokens; unmarked and outside every span (0) for the others."""
    if column in DOC_LABELS:
        return [v for ids, last, v in zip(batch["ids"], batch["last"], batch[column]) for _ in range(len(ids) + last)]
    end = 0 if column in LABEL_COLUMNS else False
    return [m for doc, last in zip(batch[column], batch["last"]) for m in (*doc, *([end] if last else []))]


def pack(docs, tokenizer, block_size: int, num_proc: int | None = None, desc: str = ""):
    """Tokenise a dataset of documents and pack it into ``block_size`` blocks, in bounded pieces."""
    import datasets

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pieces = docs.map(
        _split_long,
        batched=True,
        batch_size=64,
        fn_kwargs={"limit": PIECE_CHARS},
        remove_columns=docs.column_names,
        num_proc=num_proc,
        desc=f"splitting {desc}",
    )
    tok = pieces.map(
        _tokenize,
        batched=True,
        batch_size=32,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=pieces.column_names,
        num_proc=num_proc,
        desc=f"tokenising {desc}",
    )
    packed = tok.map(
        _pack,
        batched=True,
        batch_size=PACK_ROWS,
        remove_columns=tok.column_names,
        num_proc=num_proc,
        fn_kwargs={"block_size": block_size, "eos_id": eos, "pad_id": pad},
        desc=f"packing {desc}",
    )
    for k in LABEL_COLUMNS:
        if k in packed.column_names:
            packed = packed.cast_column(k, datasets.Sequence(datasets.Value("int16")))
    return packed


def column_hash(ds, column: str, dtype=np.int64) -> str:
    """sha256 of one column of a packed dataset, read in blocks of rows."""
    h = hashlib.sha256()
    for i in range(0, len(ds), 4096):
        h.update(np.asarray(ds[i : i + 4096][column], dtype=dtype).tobytes())
    return h.hexdigest()[:16]


def content_hash(ds) -> str:
    """sha256 of the packed token ids: identifies the data a stored ref column belongs to."""
    return column_hash(ds, "input_ids")


def _warn_unknown(tokenizer, splits: dict) -> None:
    """The built-in character tokenizer maps anything but printable ASCII to <unk>: say how much."""
    unk = tokenizer.unk_token_id
    if tokenizer.name_or_path != BUILTIN or unk is None:
        return
    for name, d in splits.items():
        n_unk = n = 0
        for i in range(0, len(d), 4096):
            rows = d[i : i + 4096]
            ids, mask = np.asarray(rows["input_ids"]), np.asarray(rows["attention_mask"], dtype=bool)
            n_unk += int(((ids == unk) & mask).sum())
            n += int(mask.sum())
        if n_unk:
            warnings.warn(
                f"data: {n_unk / n:.2%} of the characters of the {name} split are not printable ASCII and became "
                "<unk> with the built-in character tokenizer; set data.tokenizer (e.g. model=tinyllama, or a "
                "local tokenizer folder) for such text",
                stacklevel=3,
            )


def _load_cached(where: Path):
    import datasets

    meta = json.loads((where / "meta.json").read_text())
    splits = {s: datasets.load_from_disk(str(where / s)) for s in meta["splits"]}
    return {**splits, **{a: np.load(where / f"{a}.npy") for a in meta.get("arrays", [])}}, meta


def _cached(where: Path, make, meta: dict):
    """Splits from the cache at ``where``, or made by ``make()`` and cached: once (concurrent sweep jobs wait
    on the entry's lock file, saying so, and load what the first made) and atomically (written aside and
    renamed into place: nothing half-written is ever read; a damaged cache is made again). The lock holds on
    shared filesystems too (:mod:`slm.data.locks`)."""
    with CacheLock(where, f"the packed data {where}"):
        return _cached_locked(where, make, meta)


def _cached_locked(where: Path, make, meta: dict):
    for stale in where.parent.glob(where.name + ".tmp*"):  # a preparer that died: we hold the lock, it is gone
        shutil.rmtree(stale, ignore_errors=True)
    if (where / "meta.json").exists():
        try:
            loaded = _load_cached(where)
            log.info("data: loaded packed %s from %s", list(loaded[0]), where)
            return loaded
        except Exception as e:  # a truncated Arrow file, say
            log.warning("data: the cached packed data in %s is damaged (%s); packing again", where, e)
            shutil.rmtree(where, ignore_errors=True)
    made, extra = make()
    splits = {k: v for k, v in made.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in made.items() if isinstance(v, np.ndarray)}
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    for name, d in splits.items():
        d.save_to_disk(str(tmp / name))
    for name, a in arrays.items():
        np.save(tmp / f"{name}.npy", a)
    (tmp / "meta.json").write_text(
        json.dumps({"splits": list(splits), "arrays": list(arrays), **meta, **extra}, indent=1, default=str)
    )
    try:
        os.replace(tmp, where)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: packed %s into %s", {s: len(d) for s, d in splits.items()}, where)
    return _load_cached(where)


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_split(
    spec: SourceSpec,
    tokenizer,
    block_size: int,
    cache_dir: str,
    shuffle_seed: int | None = None,
    with_docs: bool = False,
):
    """One source packed as one split with the run's tokenizer and block size, cached like the rest
    (``with_docs``: also its documents' hashes, see :func:`document_hashes`)."""
    settings = {
        "pack_version": PACK_VERSION,
        **spec.identity(cache_dir),
        "tokenizer": tokenizer_identity(tokenizer),
        "block_size": block_size,
        "shuffle": shuffle_seed,
    }

    def make():

        docs = source_documents(spec)
        packed = pack(docs, tokenizer, block_size, desc=Path(str(spec.source)).name)
        if len(packed) == 0:
            raise ValueError(f"{spec.source!r} produced no tokens")
        if shuffle_seed is not None:
            packed = packed.shuffle(seed=shuffle_seed).flatten_indices()
        _warn_unknown(tokenizer, {str(spec.source): packed})
        return {"split": packed, "docs": document_hashes(docs)}, {}

    splits, _ = _cached(Path(cache_dir) / "packed" / _key(settings), make, {"settings": settings})
    return splits["split"] if not with_docs else (splits["split"], splits.get("docs"))


def build(cfg) -> PackedData:
    """Load, tokenise, pack and shuffle (train) every split, or load them from the cache; then the
    extra eval sets of ``data.eval`` (each cached on its own, so adding one repacks nothing else)."""
    cfg = data_config(cfg)
    if cfg.block_size is None:
        raise ValueError("data.block_size is null: set it, or let slm-train resolve it from the model's context length")
    tokenizer = resolve_tokenizer(cfg)
    settings = {
        "pack_version": PACK_VERSION,
        "source": source_identity(cfg),
        "tokenizer": tokenizer_identity(tokenizer),
        "block_size": cfg.block_size,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "sample_by": cfg.sample_by,
    }

    def make():
        splits = {}
        for name, docs in raw_documents(cfg).items():
            if name == "train":
                splits["train_docs"] = document_hashes(docs)
            packed = pack(docs, tokenizer, cfg.block_size, cfg.num_proc, desc=name)
            if len(packed) == 0:
                raise ValueError(f"data.source={cfg.source!r}: the {name} split produced no tokens")
            if name == "train":
                packed = packed.shuffle(seed=cfg.seed).flatten_indices()
            splits[name] = packed
        packed = {k: v for k, v in splits.items() if k != "train_docs"}
        _warn_unknown(tokenizer, packed)
        identity = {
            "tokenizer": settings["tokenizer"],
            "block_size": cfg.block_size,
            "data_hash": {s: content_hash(d) for s, d in packed.items()},
        }
        return splits, {"identity": identity}

    where = Path(cfg.cache_dir) / "packed" / _key(settings)
    splits, meta = _cached(where, make, {"settings": settings})
    train_docs = splits.pop("train_docs")
    evals = {}
    for name, spec in cfg.eval.items():
        evals[name], docs = build_split(spec, tokenizer, cfg.block_size, cfg.cache_dir, with_docs=True)
        warn_overlap(name, spec, docs, train_docs)
    evals["validation"] = splits["validation"]
    return PackedData(splits, tokenizer, meta["identity"], evals, label_names(cfg))


def resolve_tokenizer(cfg):
    """``data.tokenizer`` loaded: ``builtin``, a hub name or folder, or ``bpe:<n>``: the byte-level BPE trained
    on this corpus's training text and the reference's clean text (:mod:`slm.data.subword`), cached."""
    cfg = data_config(cfg)
    size = subword.bpe_size(cfg.tokenizer)
    if size is None:
        return load_tokenizer(cfg.tokenizer)

    def texts() -> dict:
        if cfg.source in GENERATED:  # its own training text and clean split, whatever this run trains on
            named = {f"{cfg.source}:{s}": generated_documents(cfg, s)["text"] for s in ("train", "clean")}
        else:
            named = {"train": raw_documents(cfg)["train"]["text"]}
        for i, spec in enumerate(cfg.tokenizer_text):
            named[f"tokenizer_text[{i}]"] = source_documents(spec)["text"]
        return named

    texts_identity = {
        "source": source_identity(replace(cfg, train_split="train")),
        "tokenizer_text": [spec.identity(cfg.cache_dir) for spec in cfg.tokenizer_text],
    }
    key = _key({"version": subword.VERSION, "vocab_size": size, "texts": texts_identity})
    return load_tokenizer(str(subword.cached_bpe(key, texts, size, cfg.cache_dir)))


def check_block_size(model_config, block_size: int) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise ValueError(
            f"data.block_size={block_size} is larger than the model allows (max_position_embeddings={limit}); "
            f"lower data.block_size"
        )
