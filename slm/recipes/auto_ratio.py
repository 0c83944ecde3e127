"""``selector.ratio=auto``: the ratio chosen from the data before training (:mod:`slm.selection.auto_ratio`), from
the reference's losses (stored, or live) and one scoring pass of the starting model over a fixed sample of the
training text; printed with its evidence, recorded in ``run_info.json`` (``ratio`` and ``ratio_auto``) and fixed
for the run. A resume reads it back instead of choosing again (its model is no longer the starting one)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from accelerate.utils import broadcast_object_list

from slm.model import shifted_valid, token_losses
from slm.recipes.settings import RunSettings
from slm.reference import RefSource
from slm.selection import AUTO, estimate_ratio
from slm.train.batches import fetch

log = logging.getLogger(__name__)
SAMPLE_ROWS = 64  # blocks of the training text scored (the first ones of the packed split: the same for every seed)
FALLBACK = 0.6  # Rho-1's ratio for a 1B model: where the sample shows no separate learnable mode


def choose_ratio(
    settings: RunSettings, train_ds, ref: RefSource, model, acc, earlier: dict | None
) -> tuple[RunSettings, dict | None]:
    """(settings with ``selector.ratio`` a number, the evidence recorded as ``ratio_auto``; None unless the
    ratio was ``auto``). ``earlier``: the run_info of the run a resume continues (its choice is kept)."""
    sel = settings.selector
    if sel.ratio != AUTO:
        return settings, None
    if earlier and earlier.get("ratio_auto"):
        evidence = earlier["ratio_auto"]
        log.info("selector.ratio=auto: keeping the ratio %s chosen when the run started", evidence["chosen"])
        return replace(settings, selector=replace(sel, ratio=evidence["chosen"])), evidence
    evidence = None
    if acc.is_main_process:  # one scoring pass, its answer sent to every process
        evidence = _measure(settings, train_ds, ref, model, acc.device)
    box = [evidence]
    broadcast_object_list(box)
    evidence = box[0]
    return replace(settings, selector=replace(sel, ratio=evidence["chosen"])), evidence


@torch.no_grad()
def _measure(settings: RunSettings, train_ds, ref: RefSource, model, device) -> dict:
    if any(hasattr(p, "ds_shape") for p in model.parameters()):
        raise ValueError(
            "selector.ratio=auto scores a sample with the starting model before training, and ZeRO-3 has partitioned "
            "it at creation (zero3_init_flag: true): give selector.ratio a number, or build it unpartitioned"
        )
    rows = list(range(min(SAMPLE_ROWS, len(train_ds))))
    batch = fetch(train_ds.with_format(None), rows)
    was_training, device_before = model.training, next(model.parameters()).device
    model.eval().to(device)
    excess = []
    step = max(1, int(settings.score_batch_size))
    for i in range(0, len(rows), step):
        part = {k: v[i : i + step] for k, v in batch.items()}
        ids, labels, am = (part[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
        mine = token_losses(model, ids, labels, am)
        theirs = ref.stored(rows[i : i + step])["ref_loss"] if ref.kind == "stored" else None
        if theirs is None:
            theirs = ref.values({"input_ids": ids, "labels": labels, "attention_mask": am})["ref_loss"]
        valid = shifted_valid(labels)
        excess.append((mine - theirs.to(mine.device))[valid].float().cpu())
    model.train(was_training).to(device_before)
    estimate = estimate_ratio(torch.cat(excess))
    chosen = estimate.ratio if estimate.ratio is not None else FALLBACK
    how = f"{estimate.describe()}" + ("" if estimate.ratio is not None else f"; using {FALLBACK}")
    log.info("selector.ratio=auto: %s (the starting model on %d blocks of the training text)", how, len(rows))
    return {**estimate.evidence(), "chosen": chosen, "rows": len(rows), "fallback": estimate.ratio is None}
