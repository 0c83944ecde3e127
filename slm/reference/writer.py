"""The frozen reference model: load it, score tokens live, or score a packed split once into a store.

A store (see :mod:`slm.reference.store`) holds only the reference's per-token columns (float32 ``ref_loss``,
optionally ``ref_entropy``), in shards aligned by row with the packed split it names by hash, and
``slm_ref.json``: the tokenizer identity, block size, data hash and row count, the reference's
identity and weight hash, each shard's sha256, and a seal. Training refuses a store that disagrees
with its data or reference, or that was edited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slm.data import content_hash
from slm.model import flop_model, shifted_valid, token_losses
from slm.parallel import model_init
from slm.reference import store as stores
from slm.reference.store import StoredColumns, StoreError

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1 << 20  # tokens per shard (and per resumable unit of scoring work)


def load_reference(path: str, device: torch.device | str = "cpu", dtype: str = "auto") -> nn.Module:
    """A frozen causal LM in eval mode; bfloat16 on CUDA unless ``dtype`` says otherwise."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"

    try:
        with model_init(trained=False):  # a frozen reference is never partitioned by ZeRO-3
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as e:
        raise ValueError(f"reference.path={path!r}: could not load a causal LM from the hub or that path ({e})") from e
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_vocab(model: nn.Module, reference: nn.Module) -> None:
    """Refuse a reference whose vocabulary differs: its losses would score other tokens."""
    v_model = model.get_output_embeddings().weight.shape[0]
    v_ref = reference.get_output_embeddings().weight.shape[0]
    if v_model != v_ref:
        raise ValueError(
            f"the reference's vocabulary ({v_ref} tokens) differs from the training model's ({v_model}); "
            "a reference must share the training model's tokenizer (use a model of the same family)"
        )


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reference_identity(reference: nn.Module, name: str) -> dict:
    return {"name": name, "model_type": reference.config.model_type, "weights_sha256": weights_hash(reference)}


@torch.no_grad()
def eval_losses(reference: nn.Module, eval_sets: dict, batch_size: int, device) -> dict:
    """The reference's mean loss over every valid token of each eval set (``name -> loss``): the number
    the training model's ``eval/<name>/loss`` is compared with."""
    out = {}
    for name, ds in eval_sets.items():
        ds = ds.with_format("torch")
        total, count = 0.0, 0
        for i in range(0, len(ds), batch_size):
            rows = ds[i : i + batch_size]
            ids, labels, am = (rows[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
            total += float(token_losses(reference, ids, labels, attention_mask=am).double().sum())
            count += int(shifted_valid(labels).sum())
        out[name] = total / max(count, 1)
    return out


def _rows_with_progress(n: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, unit="tok", unit_scale=True, disable=not enabled)


@torch.no_grad()
def block_losses(reference: nn.Module, ds, batch_size: int, device, progress=None, entropy: bool = False):
    """``[len(ds), block]`` float32 reference losses of a packed dataset (0 where invalid); with
    ``entropy=True`` a pair (losses, entropies of the reference's predictive distribution)."""
    losses, entropies = [], []
    ds = ds.with_format("torch")
    for i in range(0, len(ds), batch_size):
        rows = ds[i : i + batch_size]
        ids, labels, am = (rows[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
        out = token_losses(reference, ids, labels, attention_mask=am, return_entropy=entropy)
        loss, ent = out if entropy else (out, None)
        losses.append(loss.cpu().numpy())
        if entropy:
            entropies.append(ent.cpu().numpy())
        if progress is not None:
            progress.update(ids.numel())
    stack = lambda xs: np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    return (stack(losses), stack(entropies)) if entropy else stack(losses)


def _identity(meta: dict) -> dict:
    """What decides a store's content: its data, its reference, its columns (not timings)."""
    return {k: meta.get(k) for k in ("tokenizer", "block_size", "data_hash", "rows", "reference", "entropy", "dtype")}


def _claim_parts(parts: Path, identity: dict, accelerator) -> None:
    """Shards of a killed run are resumed only by the same reference on the same data."""
    marker = parts / "identity.json"
    found = json.loads(marker.read_text()) if marker.exists() else None  # every process reads before any write
    if accelerator:
        accelerator.wait_for_everyone()
    if found is not None and found != identity:
        differs = sorted(k for k in identity if found.get(k) != identity.get(k))
        raise ValueError(
            f"{parts} holds chunks scored by a killed run with another {', '.join(differs)} "
            f"({found.get('reference', {}).get('name')!r}); they are never mixed with this run's. Delete "
            f"{parts.parent} or choose another out_dir"
        )
    if found is None and (accelerator is None or accelerator.is_main_process):
        marker.write_text(json.dumps(identity, indent=1))
    if accelerator:
        accelerator.wait_for_everyone()


def _reopened(ds):
    """A fresh view of a packed split's Arrow files: dropping it unmaps the pages it read, so the
    memory of a loss pass does not grow with the corpus (a split built in memory is kept)."""
    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    if not files or getattr(ds, "_indices", None) is not None:
        return ds
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _release_freed_memory() -> None:
    """Hand memory freed by the last chunk back to the OS (glibc keeps it otherwise, and the peak
    would creep up with the number of chunks); a no-op where the C library has no malloc_trim."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def write_store(
    reference: nn.Module,
    ds,
    out_dir: str | os.PathLike,
    meta: dict,
    batch_size: int = 32,
    accelerator=None,
    entropy: bool = False,
    dtype: str = "float32",
) -> Path:
    """Score the packed split ``ds`` with ``reference`` into a store under ``out_dir``.

    Work is cut into chunks of about :data:`CHUNK_TOKENS` tokens, dealt round-robin to the
    processes of ``accelerator`` (one process without it); each process writes each chunk's
    shards as soon as they are scored (nothing is merged or held), so a killed run resumes with the
    chunks still missing (only for the same reference and data). The main process writes the
    metadata last: the shards' hashes and a seal over them.
    """
    if dtype not in stores.DTYPES:
        raise ValueError(f"dtype must be one of {stores.DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir)
    block = len(ds[0]["input_ids"])
    meta = {**meta, "rows": len(ds), "block_size": block, "entropy": entropy, "dtype": dtype}
    if "data_hash" not in meta:
        meta["data_hash"] = content_hash(ds)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(reference.parameters()).device
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _claim_parts(parts, _identity(meta), accelerator)
    columns = ("ref_loss", "ref_entropy") if entropy else ("ref_loss",)
    per_chunk = max(1, CHUNK_TOKENS // block)
    chunks = list(range(0, len(ds), per_chunk))
    done = lambda c: parts / f"{c:012d}.json"
    tokens = lambda c: min(per_chunk, len(ds) - c) * block
    missing = [c for c in chunks if not done(c).exists()]
    if len(missing) < len(chunks) and rank == 0:
        log.info("slm-score: resuming; %d of %d chunks already scored", len(chunks) - len(missing), len(chunks))
    # Chunks are dealt by their index among all chunks, so every process agrees on who does what.
    mine = [c for j, c in enumerate(chunks) if j % world == rank and c in missing]
    t0 = time.perf_counter()
    # Rank 0's bar stands for all processes: they get equal shares of the work.
    with _rows_with_progress(
        sum(map(tokens, mine)), f"scoring ({world} process{'es' * (world > 1)})", rank == 0
    ) as bar:
        for c in mine:
            view = _reopened(ds)
            scored = block_losses(
                reference, view.select(range(c, min(c + per_chunk, len(ds)))), batch_size, device, bar, entropy
            )
            del view
            values = dict(zip(columns, scored if entropy else (scored,)))
            entries = {col: stores.write_shard(out_dir, col, c, values[col], dtype, str(rank)) for col in columns}
            tmp = done(c).with_suffix(f".tmp{rank}")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, done(c))  # last: the chunk is complete
            del scored, values
            _release_freed_memory()
    seconds = time.perf_counter() - t0
    if accelerator:
        accelerator.wait_for_everyone()
    if rank == 0:
        entries = [json.loads(done(c).read_text()) for c in chunks]
        scored_now = sum(map(tokens, missing))
        meta = {
            **meta,
            "shards": {col: [e[col] for e in entries] for col in columns},
            "processes": world,
            "seconds": round(seconds, 2),  # of this scoring (a resumed one: its last part)
            "tokens_per_s": round(scored_now / seconds) if scored_now and seconds else None,
            "flops": flop_model(reference, block).forward(len(ds) * block),  # of the whole store's scoring
        }
        stores.write_meta(out_dir, meta)  # last: the store is complete
        shutil.rmtree(parts)
        log.info("slm-score: stored %s for %d blocks in %s", " and ".join(columns), len(ds), out_dir)
    if accelerator:
        accelerator.wait_for_everyone()
    return out_dir


def load_stored(out_dir: str | os.PathLike, expected: dict) -> StoredColumns:
    """The store's columns, after checking it was made for this data (and reference) and is intact.

    ``expected``: ``tokenizer``, ``block_size``, ``data_hash`` (of the split scored), ``rows``,
    optionally ``entropy`` (the column is needed), ``dtype`` (the columns' dtype), ``reference`` (an identity from
    :func:`reference_identity`) or ``reference_name``. The metadata must be unedited (its seal),
    every shard present at its recorded size, and a sample of shards must hash to what
    ``slm-score`` wrote (the others are hashed when first read); any difference raises naming it.
    """
    out_dir = Path(out_dir)
    meta = stores.read_meta(out_dir)
    for key in ("tokenizer", "block_size", "data_hash", "rows"):
        if key in expected and meta.get(key) != expected[key]:
            raise StoreError(
                f"the stored reference losses in {out_dir} were made for other data: the store has {key}="
                f"{meta.get(key)!r}, this run's data has {key}={expected[key]!r}. Pass the same data options "
                "(data=..., data.source, data.block_size, data.tokenizer, ...) as the slm-score run that made it; "
                "re-scoring is needed only for different data"
            )
    ref = meta.get("reference") or {}
    want = expected.get("reference")
    if want is not None and ref.get("weights_sha256") != want.get("weights_sha256"):
        raise StoreError(
            f"stored reference losses in {out_dir} come from reference {ref.get('name')!r} (weights "
            f"{ref.get('weights_sha256')}), not {want.get('name')!r} (weights "
            f"{want.get('weights_sha256')}); choose another out_dir or delete this one"
        )
    if expected.get("reference_name") and ref.get("name") != expected["reference_name"]:
        raise StoreError(
            f"stored reference losses in {out_dir} come from reference {ref.get('name')!r}, not "
            f"reference.path={expected['reference_name']!r}"
        )
    if "dtype" in expected and meta.get("dtype", "float32") != expected["dtype"]:
        raise StoreError(
            f"{out_dir} holds {meta.get('dtype', 'float32')} reference losses, not the {expected['dtype']} asked for "
            f"(store_dtype={expected['dtype']}): choose another out_dir, or ask for store_dtype="
            f"{meta.get('dtype', 'float32')} to reuse it"
        )
    if expected.get("entropy") and "ref_entropy" not in meta["shards"]:
        raise StoreError(
            f"this selector needs the reference's per-token entropy, and {out_dir} has no ref_entropy column: score "
            "the data into a new folder with slm-score out_dir=<another folder> entropy=true (and the same data and "
            "model options), then use that folder"
        )
    columns = StoredColumns(out_dir, meta)
    columns.check_files()
    return columns
