"""Raw documents from a data source: the built-in corpus, local files, or an HF hub dataset.

Every split comes back as a ``datasets.Dataset`` with one ``text`` column of strings. Bad input
is refused with the file, row and setting to fix: bytes that are not UTF-8, a text field that is
missing, null or not text, files holding no documents, too few documents to carve a
validation split. Nothing is silently skipped.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from slm.data import builtin as corpus
from slm.data import realtext

BUILTIN = "builtin"  # the arithmetic corpus (slm/corpus.py)
REALTEXT = "realtext"  # English prose mixed with web-style junk (slm/realtext.py)
GENERATED = (BUILTIN, REALTEXT)  # sources generated from settings, no files, no download


def generated_config(spec):
    """The settings object of a generated source: ``spec.builtin`` or ``spec.realtext`` (``spec``: a
    DataConfig or SourceSpec whose source is in GENERATED)."""
    if spec.source == BUILTIN:
        return corpus.CorpusConfig(**(spec.builtin or {}))
    return realtext.RealTextConfig(**(spec.realtext or {}))


def generated_documents(spec, split: str):
    import datasets

    documents = corpus.arithmetic_documents if spec.source == BUILTIN else realtext.realtext_documents
    return datasets.Dataset.from_list(documents(generated_config(spec), split))


FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# Up to this many files, each document of a local source records which file it came from (``source_id``),
# and a run's selection audit reports the share kept of each (``label_names``).
PER_SOURCE_FILES = 64
SOURCE_COLUMN = "source_id"


def label_names(cfg) -> dict:
    """What the per-token label columns packing keeps mean (column -> a name per label): the built-in corpora's
    kinds of junk (label 0: not junk), a local source's files."""
    if cfg.source in GENERATED:
        kinds = corpus.JUNK_KINDS if cfg.source == BUILTIN else realtext.JUNK_KINDS
        return {"junk_kind": ["not junk", *kinds]}
    if is_local(cfg.source):
        files = data_files(cfg.source)
        if 1 < len(files) <= PER_SOURCE_FILES:
            names = [Path(f).name for f in files]
            if len(set(names)) < len(names):
                names = [os.path.relpath(f, os.path.commonpath(files)) for f in files]
            return {SOURCE_COLUMN: names}
    return {}


def data_files(source: str) -> list[str]:
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


def content_digest(path: str, cache_dir: str) -> str:
    """sha256 of a file's bytes: what identifies a local source (a file replaced by another of the
    same size and modification time, as ``cp -p`` or ``rsync -a`` leave it, is new data). The
    digest is remembered under ``cache_dir/filehash`` by the file's path, size, modification and
    status-change times and inode; ``cp -p`` cannot carry the status-change time over, so any
    rewrite of the bytes is hashed again. As git does, a file changed within two seconds of being
    hashed is hashed again next time (a timestamp's resolution can hide a quick rewrite)."""
    import json
    import time

    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = Path(cache_dir) / "filehash" / (hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24] + ".json")
    try:
        known = json.loads(memo.read_text())
        if known["stamp"] == stamp and st.st_ctime_ns < known["hashed_ns"] - 2_000_000_000:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hashed_ns = time.time_ns()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()[:32]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest, "hashed_ns": hashed_ns}))
        os.replace(tmp, memo)
    except OSError:  # a read-only cache: hash again next time
        pass
    return digest


def is_local(source: str) -> bool:
    """A path, glob or file name; anything else (``org/name``) is a hub dataset name."""
    return (
        os.path.exists(os.path.expanduser(source))
        or any(c in source for c in "*?[")
        or source.startswith((".", "/", "~"))
        or Path(source).suffix in FORMATS
    )


def _first_bad_utf8(files: list[str]) -> str | None:
    for f in files:
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{f}, line {lineno}: byte 0x{line[e.start]:02x} at column {e.start + 1}"
    return None


def _only_whitespace(files: list[str]) -> bool:
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                if chunk.strip():
                    return False
    return True


_RAW_CACHE: list[str] = []


def _raw_cache() -> str:
    """This process's own folder for datasets' build of local files (under ``TMPDIR``, removed at exit).
    datasets' builders write into a temporary folder of their shared cache and rename it into place, so
    processes building the same file at once (a sweep's jobs starting together) remove each other's
    (``No such file or directory: .../tmpXXXX``). The files are read afresh every time anyway (below):
    slm's packed cache, keyed by content, is the shared one."""
    if not _RAW_CACHE:
        _RAW_CACHE.append(tempfile.mkdtemp(prefix="slm-raw-"))
        atexit.register(shutil.rmtree, _RAW_CACHE[0], ignore_errors=True)
    return _RAW_CACHE[0]


def _load_files(cfg) -> dict:
    import datasets

    files = data_files(cfg.source)
    builder = FORMATS[Path(files[0]).suffix]
    if builder != "parquet":
        if _only_whitespace(files):
            raise ValueError(f"data.source={cfg.source!r}: no documents (the files are empty or hold only blank lines)")
        # Checked up front: the loaders accept bad bytes and fail later, far from the file that has them.
        bad = _first_bad_utf8(files)
        if bad is not None:
            raise ValueError(
                f"data.source={cfg.source!r}: not UTF-8 text ({bad}). Convert the file, e.g. "
                "iconv -f latin1 -t utf-8 in.jsonl > out.jsonl"
            )
    kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
    # Read afresh: datasets' own cache knows a file by its path and modification time, and would hand back
    # the old rows of a file replaced with the same time (slm's packed cache, keyed by content, is the cache).
    kwargs["download_mode"] = datasets.DownloadMode.FORCE_REDOWNLOAD

    def load(some: list[str]):
        d = datasets.load_dataset(builder, data_files=some, split="train", cache_dir=_raw_cache(), **kwargs)
        theirs = SOURCE_COLUMN in d.column_names and cfg.text_field != SOURCE_COLUMN
        return d.remove_columns(SOURCE_COLUMN) if theirs else d  # a field of the files' own, not slm's label

    try:
        if not 1 < len(files) <= PER_SOURCE_FILES:
            return {"train": load(files)}
        # file by file, in the same order as all at once: each document records the file it came from
        parts = [load([f]) for f in files]
        parts = [d.add_column(SOURCE_COLUMN, [i] * len(d)) for i, d in enumerate(parts)]
        return {"train": datasets.concatenate_datasets(parts)}
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        raise ValueError(f"data.source={cfg.source!r}: could not read the {builder} files: {e.__cause__ or e}") from e


def _check_text(d, source: str, split: str, field: str) -> None:
    """The text field holds a string in every row (no null, missing or non-text values)."""
    feature = d.features[field]
    is_text = getattr(feature, "dtype", None) in ("string", "large_string")
    if is_text and d.data.column(field).null_count == 0:
        return
    bad = []
    for i, value in enumerate(d[field]):
        if not isinstance(value, str):
            bad.append(f"row {i}: {'missing or null' if value is None else type(value).__name__ + ' ' + repr(value)}")
            if len(bad) == 3:
                break
    raise ValueError(
        f"data.source={source!r} ({split}): data.text_field={field!r} must be text in every row, but "
        f"{'; '.join(bad)}. Fix those rows, or point data.text_field at the column that holds the text"
    )


def raw_documents(cfg) -> dict:
    """Split name -> a ``datasets.Dataset`` of documents with a ``text`` column (``cfg``: DataConfig)."""
    import datasets

    if cfg.source in GENERATED:
        docs = {s: generated_documents(cfg, s) for s in ("train", "clean", "validation")}
        if cfg.train_split not in docs:
            raise ValueError(f"data.train_split={cfg.train_split!r}: the {cfg.source} corpus has {sorted(docs)}")
        docs["train"] = docs[cfg.train_split]  # train_split=clean: a run on the reference's clean text alone
        return docs
    if is_local(cfg.source):
        ds = _load_files(cfg)
    else:
        try:
            loaded = datasets.load_dataset(cfg.source, cfg.hub_config, revision=cfg.hub_revision)
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
        _check_text(d, cfg.source, name, cfg.text_field)
        own = [SOURCE_COLUMN] if is_local(cfg.source) and SOURCE_COLUMN in d.column_names else []  # not a hub's
        d = d.select_columns([cfg.text_field, *own])
        ds[name] = d.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else d
    if "validation" not in ds:
        if len(ds["train"]) < 2:
            raise ValueError(
                f"data.source={cfg.source!r} holds {len(ds['train'])} document: carving a validation split "
                "(data.val_fraction) needs at least 2. Add documents (for .txt files, data.sample_by=paragraph "
                "splits on blank lines and =line on every line)"
            )
        parts = ds["train"].train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
        ds = {"train": parts["train"], "validation": parts["test"]}
    return ds


def source_documents(spec) -> object:
    """All documents of one source as a single split (an eval set, a reference's training text).

    ``spec`` has ``source``, ``text_field``, ``split`` (hub split or built-in split; files: all of
    them), ``sample_by``, ``hub_config`` and ``builtin`` (the corpus settings).
    """
    import datasets

    if spec.source in GENERATED:
        return generated_documents(spec, spec.split or "validation")
    if is_local(spec.source):
        d = _load_files(spec)["train"]
    else:
        try:
            d = datasets.load_dataset(spec.source, spec.hub_config, split=spec.split or "validation")
        except Exception as e:  # offline, unknown name or split, gated, ...
            raise ValueError(f"{spec.source!r}: could not load this hub dataset split ({e})") from e
    if spec.text_field not in d.column_names:
        raise ValueError(
            f"text_field={spec.text_field!r} is not a column of {spec.source!r}; columns: {d.column_names}"
        )
    if len(d) == 0:
        raise ValueError(f"{spec.source!r}: no documents")
    _check_text(d, spec.source, spec.split or "all", spec.text_field)
    d = d.select_columns([spec.text_field])
    return d.rename_column(spec.text_field, "text") if spec.text_field != "text" else d


OVERLAP_WARNING = 0.01  # share of an eval set's documents also in the training data that gets a warning


def document_hashes(docs) -> np.ndarray:
    """64-bit hashes of a split's documents (their exact text), sorted and unique."""
    out = []
    for batch in docs.iter(batch_size=4096):
        out += [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in batch["text"]]
    return np.unique(np.asarray(out, dtype=np.uint64))


def warn_overlap(name: str, spec, docs: np.ndarray | None, train_docs: np.ndarray) -> None:
    """An eval set that shares documents with the training data measures recall, not generalisation."""
    if docs is None or not len(docs):
        return
    share = float(np.isin(docs, train_docs).mean())
    if share > OVERLAP_WARNING:
        warnings.warn(
            f"data.eval.{name}: {share:.1%} of its {len(docs)} documents ({spec.source}) are also in the training "
            "data; its loss measures what the model memorised, not how it generalises. Use held-out text",
            stacklevel=3,
        )
