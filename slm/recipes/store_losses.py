"""What ``slm-score`` runs: a reference's per-token losses over a packed training split, stored once (a
reference slm trains itself, or a live model), with the reference's eval losses and quality beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slm import parallel, runs
from slm.data import build
from slm.recipes.cached_training import train_reference
from slm.recipes.references import (
    check_reference_tokenizer,
    check_score_vocab,
    measured_quality,
    reference_eval,
    stored_losses,
    trained_quality,
)
from slm.recipes.settings import ScoreSettings, resolve_block_size
from slm.reference import META_FILE, load_reference, read_meta


@dataclass(frozen=True)
class StoredLosses:
    """A store as :func:`store_losses` left it (read on the main process; the others get ``meta={}``)."""

    path: Path
    rows: int  # blocks of the training split
    reused: bool  # an earlier run had stored these exact losses
    meta: dict  # the store's metadata (tokens_per_s, processes, ...)
    quality: dict | None  # how well a reference slm trained did (None: another reference)
    eval_losses: dict | None  # the reference's loss on each eval set


def store_losses(settings: ScoreSettings) -> StoredLosses:
    settings = resolve_block_size(settings)
    acc = parallel.make_accelerator("no")
    parallel.quiet_other_processes(acc)
    with acc.main_process_first():
        data = build(settings.data)
    rcfg = settings.reference
    if rcfg.trained:
        name, ref = train_reference(settings, data, acc)
    else:  # live
        check_reference_tokenizer(rcfg, data)
        name, ref = rcfg.path, load_reference(rcfg.path, device=acc.device, dtype=rcfg.dtype)
    check_score_vocab(settings, data, ref)
    out, reused = stored_losses(
        settings,
        data,
        ref,
        name,
        acc,
        out_dir=settings.out_dir,
        entropy=settings.entropy,
        dtype=settings.store_dtype,
    )
    ref_eval = reference_eval(settings, data, acc, read_meta(out)["reference"], ref)  # hashed once, by the store
    meta = (runs.read_json(out / META_FILE) or {}) if acc.is_main_process else {}
    trained = trained_quality(name) if rcfg.trained else None
    quality = measured_quality(trained, ref_eval, next(iter(data.eval_sets), None)) if trained else None
    return StoredLosses(out, len(data["train"]), reused, meta, quality, ref_eval)
