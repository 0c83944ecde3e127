"""A reference store on disk: per-token reference columns, in shards, aligned by row with a packed split.

A store is a folder holding only the reference's columns (``ref_loss``, optionally
``ref_entropy``), each cut into shards of consecutive rows (``<column>/<first row>.npy``, one
``[rows, block]`` array per shard), and ``slm_ref.json``: what the columns belong to (the packed
split's data hash, row count, block size and tokenizer; the reference's identity), each shard's
size and sha256, and a seal over all of it. The token ids stay where they are, in the packed data
cache, which the store names by its hash instead of copying.

Shards are written one by one, by whichever process scored them, and never concatenated: memory
stays flat in the corpus size. Opening a store costs O(shards) (the metadata, every shard's size,
and a few shards hashed in full); every other shard is hashed the first time it is read, and
``slm-score --verify <store>`` hashes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from slm.data import PackedData

META_FILE = "slm_ref.json"
COLUMNS = ("ref_loss", "ref_entropy")
DTYPES = ("float32", "bfloat16")  # bfloat16: half the size, reference values rounded to 8 bits of mantissa
SAMPLED_SHARDS = 4  # shards hashed in full when a store is opened (the rest when first read)
REDO = "rerun slm-score (into a new out_dir)"


class StoreError(ValueError):
    """A store that does not belong to this data or reference, or that was edited or damaged."""


def shard_name(column: str, first_row: int) -> str:
    return f"{column}/{first_row:012d}.npy"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored: float32, or bfloat16's bit patterns as uint16 (numpy has no bfloat16)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode(stored: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "float32":
        return torch.from_numpy(np.array(stored, dtype=np.float32))
    return torch.from_numpy(np.array(stored, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()


def write_shard(folder: Path, column: str, first_row: int, values: np.ndarray, dtype: str, tag: str) -> dict:
    """Write one shard atomically (a temporary file renamed into place); its manifest entry."""
    path = folder / shard_name(column, first_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{tag}.npy")
    np.save(tmp, encode(values, dtype))
    os.replace(tmp, path)
    return {
        "first_row": first_row,
        "rows": int(values.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def seal(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_meta(folder: Path, meta: dict) -> None:
    """The metadata, sealed, written last: a store without it is incomplete."""
    meta = {**meta, "seal": None}
    meta["seal"] = seal(meta)
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"reference.scores_dir={str(folder)!r} holds no stored reference losses ({META_FILE} missing); "
            "run slm-score first"
        )
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); {REDO}") from e
    if not isinstance(meta, dict) or meta.get("seal") != seal(meta):
        raise StoreError(f"{path} was edited after slm-score wrote it (its seal does not match); {REDO}")
    if "shards" not in meta:
        raise StoreError(f"{folder} is a store of an earlier slm version (a copy of the dataset); {REDO}")
    return meta


class StoredColumns:
    """Reads rows of a store's columns, verifying each shard the first time it is read."""

    def __init__(self, folder: str | os.PathLike, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.dtype = meta.get("dtype", "float32")
        self.columns = [c for c in COLUMNS if c in meta["shards"]]
        firsts = [s["first_row"] for s in meta["shards"]["ref_loss"]]
        self._firsts = np.asarray(firsts, dtype=np.int64)
        self._open: dict[tuple[str, int], np.ndarray] = {}
        self._verified: set[tuple[str, int]] = set()

    def check_files(self, sample: int = SAMPLED_SHARDS) -> None:
        """Every shard present with its recorded size, rows that cover the split exactly once, and
        ``sample`` shards (the first, the last, some between) hashed in full."""
        rows = self.meta["rows"]
        for column in self.columns:
            shards = self.meta["shards"][column]
            covered = sum(s["rows"] for s in shards)
            starts = [s["first_row"] for s in shards]
            if covered != rows or starts != sorted(starts) or (shards and starts[0] != 0):
                raise StoreError(
                    f"{self.folder}: the {column} shards cover {covered} rows, not the data's {rows}; {REDO}"
                )
            for s in shards:
                path = self.folder / shard_name(column, s["first_row"])
                size = path.stat().st_size if path.exists() else None
                if size != s["bytes"]:
                    what = "missing" if size is None else f"{size} bytes, not {s['bytes']}"
                    raise StoreError(f"{path} is {what}: the store is damaged; {REDO}")
            picks = sorted({0, len(shards) - 1, *np.linspace(0, len(shards) - 1, max(sample, 2)).astype(int)})
            for i in picks[:sample] if sample else []:
                self._verify(column, i)

    def verify_all(self, progress=None) -> None:
        for column in self.columns:
            for i in range(len(self.meta["shards"][column])):
                self._verify(column, i)
                if progress is not None:
                    progress.update(self.meta["shards"][column][i]["rows"])

    def _verify(self, column: str, i: int) -> None:
        if (column, i) in self._verified:
            return
        s = self.meta["shards"][column][i]
        path = self.folder / shard_name(column, s["first_row"])
        if not path.exists() or file_sha256(path) != s["sha256"]:
            raise StoreError(f"{path} is not what slm-score wrote (edited or damaged: its sha256 differs); {REDO}")
        self._verified.add((column, i))

    def _shard(self, column: str, i: int) -> np.ndarray:
        key = (column, i)
        if key not in self._open:
            self._verify(column, i)
            s = self.meta["shards"][column][i]
            arr = np.load(self.folder / shard_name(column, s["first_row"]), mmap_mode="r")
            if arr.shape != (s["rows"], self.meta["block_size"]):
                raise StoreError(f"{self.folder}: shard {i} of {column} has shape {arr.shape}; {REDO}")
            if len(self._open) >= 64:  # a bounded number of open maps
                self._open.pop(next(iter(self._open)))
            self._open[key] = arr
        return self._open[key]

    def rows(self, idx, column: str = "ref_loss") -> torch.Tensor:
        """``[len(idx), block]`` float32 values of rows ``idx`` (indices into the packed split)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.meta["rows"]):
            raise IndexError(f"row indices out of range for a store of {self.meta['rows']} rows")
        shard = np.searchsorted(self._firsts, idx, side="right") - 1
        out = np.empty((idx.size, self.meta["block_size"]), dtype=np.float32)
        for i in np.unique(shard):
            at = np.nonzero(shard == i)[0]
            out[at] = decode(self._shard(column, int(i))[idx[at] - self._firsts[i]], self.dtype).numpy()
        return torch.from_numpy(out)


def expected_store(data: PackedData) -> dict:
    return {
        "tokenizer": data.identity["tokenizer"],
        "block_size": data.identity["block_size"],
        "data_hash": data.identity["data_hash"]["train"],
        "rows": len(data["train"]),
    }
