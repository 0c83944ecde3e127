"""``selector.ratio=auto``: the ratio chosen from the data before training (:mod:`slm.selection.auto_ratio`): one
scoring pass of the starting model over a fixed sample of the training text (against the reference's stored or
live losses) and over clean held-out text (the eval set ``eval/loss`` follows, against the reference itself);
printed with its evidence, recorded in ``run_info.json`` (``ratio`` and ``ratio_auto``) and fixed for the run. A
resume reads it back instead of choosing again (its model is no longer the starting one)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from accelerate.utils import broadcast_object_list

from slm.data import GENERATED
from slm.model import shifted_valid, token_losses
from slm.recipes.references import local_reference
from slm.recipes.settings import RunSettings
from slm.reference import RefSource
from slm.selection import AUTO, estimate_ratio
from slm.train.batches import fetch

log = logging.getLogger(__name__)
SAMPLE_ROWS = 64  # blocks of each text scored (the first ones: the same for every seed of a sweep)


def choose_ratio(
    settings: RunSettings, train_ds, clean: tuple, ref: RefSource, model, acc, earlier: dict | None
) -> tuple[RunSettings, dict | None]:
    """(settings with ``selector.ratio`` a number, the evidence recorded as ``ratio_auto``; None unless the
    ratio was ``auto``). ``clean``: (name, packed eval set) of clean held-out text; ``earlier``: the run_info of
    the run a resume continues (its choice is kept)."""
    sel = settings.selector
    if sel.ratio != AUTO:
        return settings, None
    if earlier and earlier.get("ratio_auto"):
        evidence = earlier["ratio_auto"]
        log.info("selector.ratio=auto: keeping the ratio %s chosen when the run started", evidence["ratio"])
        return replace(settings, selector=replace(sel, ratio=evidence["ratio"])), evidence
    evidence = None
    if acc.is_main_process:  # one scoring pass, its answer sent to every process
        evidence = _measure(settings, train_ds, clean, ref, model, acc.device)
    box = [evidence]
    broadcast_object_list(box)
    evidence = box[0]
    return replace(settings, selector=replace(sel, ratio=evidence["ratio"])), evidence


@torch.no_grad()
def _measure(settings: RunSettings, train_ds, clean: tuple, ref: RefSource, model, device) -> dict:
    if any(hasattr(p, "ds_shape") for p in model.parameters()):
        raise ValueError(
            "selector.ratio=auto scores samples with the starting model before training, and ZeRO-3 has partitioned "
            "it at creation (zero3_init_flag: true): give selector.ratio a number, or build it unpartitioned"
        )
    name, clean_ds = clean
    if name == "validation" and settings.data.source not in GENERATED:
        log.warning(
            "selector.ratio=auto compares the training text with the validation split, which for data.source=%s is "
            "carved from (or ships with) the training source and is not known to be clean: if it holds the same "
            "noise, auto counts that noise as learnable and keeps too much. Give clean held-out text as "
            "data.eval.<name> (it comes first)",
            settings.data.source,
        )
    reference = ref.model if ref.kind == "live" else None
    if reference is None and ref.store is not None:
        reference = local_reference(ref.store.meta.get("reference") or {}, device)
    if reference is None:
        raise ValueError(
            "selector.ratio=auto scores clean held-out text with the reference, and the reference this store was "
            f"scored with ({(ref.store.meta.get('reference') or {}).get('name') if ref.store else None}) is not on "
            "this machine: give selector.ratio a number, or use reference=train or live"
        )
    was_training, device_before = model.training, next(model.parameters()).device
    model.eval().to(device)
    stored = (lambda rows: ref.stored(rows)["ref_loss"]) if ref.kind == "stored" else None
    train = _excess(model, reference, train_ds, stored, settings.score_batch_size, device)
    held_out = _excess(model, reference, clean_ds, None, settings.score_batch_size, device)
    model.train(was_training).to(device_before)
    estimate = estimate_ratio(train, held_out)
    log.info(
        "selector.ratio=auto: %s (the starting model on the first %d blocks of the training text and of the %s set)",
        estimate.describe(),
        SAMPLE_ROWS,
        name,
    )
    return {**estimate.evidence(), "rows": SAMPLE_ROWS, "clean_set": name}


def _excess(model, reference, ds, stored, batch_size: int, device) -> torch.Tensor:
    """Excess losses of the valid tokens of the first SAMPLE_ROWS rows of ``ds`` (the reference's losses from
    ``stored(rows)`` where given, else from ``reference``)."""
    rows = list(range(min(SAMPLE_ROWS, len(ds))))
    batch = fetch(ds.with_format(None), rows)
    out, step = [], max(1, int(batch_size))
    for i in range(0, len(rows), step):
        ids, labels, am = (batch[k][i : i + step].to(device) for k in ("input_ids", "labels", "attention_mask"))
        mine = token_losses(model, ids, labels, am)
        theirs = stored(rows[i : i + step]).to(device) if stored else token_losses(reference, ids, labels, am)
        out.append((mine - theirs)[shifted_valid(labels)].float().cpu())
    return torch.cat(out)
