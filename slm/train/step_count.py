"""How many tokens a training step trains, counted before any forward (``num_to_keep(ratio, n_valid)`` per
scope unit, or the mask column's sum; block selection's kept blocks counted on the device where they stay),
for the whole step on every process in one all-reduce: the step's first read of the device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from slm.model import shifted_valid
from slm.model.rows import to_host
from slm.reference import StoreError
from slm.selection import count_selected, num_to_keep, to_device_async


class StepCount(NamedTuple):
    trained: int | None  # tokens the step trains (None: the scores decide; counted after its one forward)
    trained_on: int  # tokens of the blocks it trains on (the kept blocks')
    valid: int  # valid tokens among them
    read: int  # tokens it read (every candidate block's)


def count_step(run, batches: list[dict], ratio: float, candidates: int) -> StepCount:
    """What a step of ``run`` trains and reads, over every micro-batch and process, counted where the batches
    are (kept blocks stay on the device) and read in one all-reduce (``candidates``: the tokens of every
    candidate block it read). A damaged stored-reference shard read by any process stops every process here,
    before any forward."""
    lm = run.selective
    valid = [shifted_valid(b["labels"]) for b in batches]
    if run.selection.oracle:  # exactly the tokens it marks
        local = [(run.selection.mask(b) & v).sum() for b, v in zip(batches, valid)]
    else:
        local = [count_selected(v, ratio, lm.scope if lm.scope == "sequence" else "batch") for v in valid]
    n_valid = [v.sum() for v in valid]
    tokens = [b["attention_mask"].sum() for b in batches]
    store_error = float(run.ref.error is not None)  # a damaged store shard read on some process
    device = run.acc.device
    counts = torch.cat([
        to_device_async(torch.stack([*local, *n_valid, *tokens]).double(), device),
        to_device_async(torch.tensor([candidates, store_error], dtype=torch.float64), device),
    ])  # fmt: skip
    *counts, candidates, store_error = to_host(run.acc.reduce(counts, "sum"))
    if store_error:  # every process stops here, before any forward
        raise StoreError(run.ref.error or "a stored reference shard read by another process failed its check")
    k = len(batches)
    tokens, candidates, valid = int(sum(counts[2 * k :])), int(candidates), int(sum(counts[k : 2 * k]))
    if run.selection.oracle:
        return StepCount(int(sum(counts[:k])), tokens, valid, candidates)
    if not lm.fixed_count:
        return StepCount(None, tokens, valid, candidates)
    if lm.scope == "global" and ratio < 1.0:  # top-k over each global micro-batch
        return StepCount(sum(num_to_keep(ratio, int(n)) for n in counts[k : 2 * k]), tokens, valid, candidates)
    return StepCount(int(sum(counts[:k])), tokens, valid, candidates)
