"""The frozen reference model: load it, score tokens live, or score a dataset once and store it.

A stored score set is a folder holding the packed dataset with a ``ref_loss`` column (float32,
aligned with ``labels``) and ``slm_ref.json``: the tokenizer identity, block size, data hash and
the reference's identity and weight hash. Training refuses a store that disagrees with its data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slm.scoring import token_losses

log = logging.getLogger(__name__)

META_FILE = "slm_ref.json"
CHUNK_BLOCKS = 256  # blocks per resumable unit of work


def load_reference(path: str, device: torch.device | str = "cpu", dtype: str = "auto") -> nn.Module:
    """A frozen causal LM in eval mode; bfloat16 on CUDA unless ``dtype`` says otherwise."""
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    from slm.parallel import model_init

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


def _rows_with_progress(n: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, unit="tok", unit_scale=True, disable=not enabled)


@torch.no_grad()
def score_blocks(reference: nn.Module, ds, batch_size: int, device, progress=None, entropy: bool = False):
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
    return {k: meta.get(k) for k in ("tokenizer", "block_size", "data_hash", "rows", "reference", "entropy")}


def _seal(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _claim_parts(parts: Path, identity: dict, accelerator) -> None:
    """Chunks of a killed run are resumed only by the same reference on the same data."""
    marker = parts / "identity.json"
    found = json.loads(marker.read_text()) if marker.exists() else None  # every process reads before any write
    if accelerator:
        accelerator.wait_for_everyone()
    if found is not None and found != identity:
        differs = sorted(k for k in identity if found.get(k) != identity.get(k))
        raise ValueError(
            f"{parts} holds chunks scored by a killed run with another {', '.join(differs)} "
            f"({found.get('reference', {}).get('name')!r}); they are never mixed with this run's. Delete {parts} "
            "or choose another out_dir"
        )
    if found is None and (accelerator is None or accelerator.is_main_process):
        marker.write_text(json.dumps(identity, indent=1))
    if accelerator:
        accelerator.wait_for_everyone()


def score_dataset(reference: nn.Module, ds, out_dir: str | os.PathLike, meta: dict, batch_size: int = 32,
                  accelerator=None, entropy: bool = False) -> Path:  # fmt: skip
    """Score ``ds`` with ``reference`` and store it with a ``ref_loss`` column under ``out_dir``.

    Work is cut into chunks of :data:`CHUNK_BLOCKS` blocks, dealt round-robin to the processes of
    ``accelerator`` (one process without it). Each finished chunk is saved at once, so a killed
    run resumes with the chunks still missing (only for the same reference and data). The main
    process merges and writes the store, with hashes of its columns and a seal over its metadata.
    """
    from slm.data import column_hash, content_hash

    out_dir = Path(out_dir)
    meta = {"data_hash": content_hash(ds), **meta, "rows": len(ds), "entropy": entropy}
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(reference.parameters()).device
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _claim_parts(parts, _identity(meta), accelerator)
    part = lambda c, what="loss": parts / f"{c:09d}.{what}.npy"
    block = len(ds[0]["input_ids"])
    tokens = lambda c: min(CHUNK_BLOCKS, len(ds) - c) * block
    chunks = list(range(0, len(ds), CHUNK_BLOCKS))
    missing = [c for c in chunks if not part(c).exists()]
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
            sub = ds.select(range(c, min(c + CHUNK_BLOCKS, len(ds))))
            scored = score_blocks(reference, sub, batch_size, device, bar, entropy)
            loss, ent = scored if entropy else (scored, None)
            for what, values in (("entropy", ent), ("loss", loss)):  # the loss file last: it marks the chunk done
                if values is not None:
                    tmp = parts / f"{c:09d}.{what}.tmp{rank}.npy"
                    np.save(tmp, values.astype(np.float32))
                    os.replace(tmp, part(c, what))
    seconds = time.perf_counter() - t0
    if accelerator:
        accelerator.wait_for_everyone()
    store = out_dir / "dataset"
    if rank == 0:
        from datasets import Sequence, Value

        scored = ds
        for column, what in (("ref_loss", "loss"), ("ref_entropy", "entropy"))[: 2 if entropy else 1]:
            values = np.concatenate([np.load(part(c, what)) for c in chunks])
            scored = scored.add_column(column, list(values), feature=Sequence(Value("float32")))
            meta[f"{column}_sha256"] = column_hash(scored, column, np.float32)
        scored.save_to_disk(str(store))
        scored_now = sum(map(tokens, missing))
        meta = {**meta, "labels_sha256": column_hash(scored, "labels"), "processes": world,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(scored_now / seconds) if scored_now and seconds else None}  # fmt: skip
        meta["seal"] = _seal(meta)
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))  # last: the store is complete
        shutil.rmtree(parts)
        log.info("slm-score: stored %d blocks with ref_loss in %s", len(scored), store)
    if accelerator:
        accelerator.wait_for_everyone()
    return store


def load_stored(out_dir: str | os.PathLike, expected: dict):
    """The stored dataset with ``ref_loss``, after checking it was made for this data and is intact.

    ``expected``: ``tokenizer``, ``block_size``, ``data_hash`` (of the split scored), ``rows``,
    and optionally ``reference`` (an identity from :func:`reference_identity`) or
    ``reference_name``. The metadata must be unedited (its seal), and the stored token ids,
    labels and reference losses must hash to what ``slm-score`` wrote; any difference raises
    naming it.
    """
    from datasets import load_from_disk

    from slm.data import column_hash, content_hash

    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"reference.scores_dir={str(out_dir)!r} holds no stored reference losses ({META_FILE} missing); "
            "run slm-score first"
        )
    redo = "rerun slm-score (into a new out_dir)"
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); {redo}") from e
    if not isinstance(meta, dict) or meta.get("seal") != _seal(meta):
        raise ValueError(f"{meta_path} was edited after slm-score wrote it (its seal does not match); {redo}")
    for key in ("tokenizer", "block_size", "data_hash", "rows"):
        if key in expected and meta.get(key) != expected[key]:
            raise ValueError(
                f"stored reference losses in {out_dir} were made with {key}={meta.get(key)!r}, but this run "
                f"uses {key}={expected[key]!r}; rerun slm-score with this run's data settings"
            )
    ref = meta.get("reference") or {}
    want = expected.get("reference")
    if want is not None and ref.get("weights_sha256") != want.get("weights_sha256"):
        raise ValueError(f"stored reference losses in {out_dir} come from reference {ref.get('name')!r} (weights "
                         f"{ref.get('weights_sha256')}), not {want.get('name')!r} (weights "
                         f"{want.get('weights_sha256')}); choose another out_dir or delete this one")  # fmt: skip
    if expected.get("reference_name") and ref.get("name") != expected["reference_name"]:
        raise ValueError(f"stored reference losses in {out_dir} come from reference {ref.get('name')!r}, not "
                         f"reference.path={expected['reference_name']!r}")  # fmt: skip
    try:
        ds = load_from_disk(str(out_dir / "dataset"))
    except Exception as e:  # a truncated or missing Arrow file
        raise ValueError(f"{out_dir}/dataset could not be read ({type(e).__name__}: {e}); the store is damaged; "
                         f"{redo}") from e  # fmt: skip
    if "ref_loss" not in ds.column_names:
        raise ValueError(f"{out_dir}/dataset has no ref_loss column (columns: {ds.column_names})")
    if expected.get("entropy") and "ref_entropy" not in ds.column_names:
        raise ValueError(f"this selector needs the reference's per-token entropy, which {out_dir} does not hold; "
                         "score again with slm-score entropy=true")  # fmt: skip
    checks = [("rows", len(ds), meta.get("rows")), ("token ids", content_hash(ds), meta.get("data_hash")),
              ("labels", column_hash(ds, "labels"), meta.get("labels_sha256")),
              ("reference losses", column_hash(ds, "ref_loss", np.float32), meta.get("ref_loss_sha256"))]  # fmt: skip
    if "ref_entropy" in ds.column_names:
        checks.append(("reference entropies", column_hash(ds, "ref_entropy", np.float32),
                       meta.get("ref_entropy_sha256")))  # fmt: skip
    for what, found, recorded in checks:
        if found != recorded:
            raise ValueError(f"the stored {what} in {out_dir}/dataset are not what slm-score wrote (edited or "
                             f"damaged: {found} vs {recorded}); {redo}")  # fmt: skip
    return ds, meta


@dataclass
class RefSource:
    """Where reference values come from: none, stored columns (``ref_loss``, ``ref_entropy``), or a
    live model. ``entropy``: the selector also needs the reference's per-token entropy."""

    kind: str = "none"  # none | stored | live
    model: nn.Module | None = None
    scores_dir: str | None = None  # where stored columns came from
    entropy: bool = False

    @property
    def columns(self) -> list[str]:
        return ["ref_loss"] + (["ref_entropy"] if self.entropy else []) if self.kind == "stored" else []

    def values(self, batch: dict) -> dict:
        """Keyword arguments for SelectiveLM: ``ref_loss`` (and ``ref_entropy``) of this batch."""
        if self.kind == "stored":
            return {c: batch[c] for c in self.columns}
        if self.kind == "live":
            out = token_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                               return_entropy=self.entropy)  # fmt: skip
            return {"ref_loss": out[0], "ref_entropy": out[1]} if self.entropy else {"ref_loss": out}
        return {}
